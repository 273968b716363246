"""The engine: what one training step runs through, bottom up.

topology (rank arithmetic, group creation) -> collectives (flat and hierarchical all-gather / reduce-scatter,
replica all-reduce, bytes booked per link class) -> unit (one unit's shards, flat buffers, streams) -> hooks
(the step's state machine) -> shard (shard_model, no_sync) -> optim, stats, teardown.
The engine imports nothing outside this package and mics_hf.config.
"""

from . import generation  # noqa: E402,F401  (gives sharded models a generate() that decodes in lockstep)
