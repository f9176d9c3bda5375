"""``load_format="sharded_state"``: each tensor-parallel rank saves and loads its own slice.

``loader`` (``ShardedStateLoader``), ``saver`` (``save_sharded_state``), ``manifest``
(file-name patterns and the ``Manifest`` written beside the files), ``directory`` (the
atomic swap of a checkpoint directory) and ``weight_region`` (a CPU model's weights as
one block laid out as its file). See docs/sharded_state.md.
"""
