"""The images a job sees: folders and manifests listed, hashed, split, decoded; the demo set.

May import emotr's leaves (config, config_io, errors, storage; track's Tracker as a type, for
the listing's record on a run) and nothing else of emotr: every other room builds on the
listing and the decode rules defined here.
"""
