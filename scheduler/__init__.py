"""Routing analysis, tile plans, comm/compute split, tuner and config tables (imported as `comet.scheduler`)."""
