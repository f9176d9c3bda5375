"""``load_format="sharded_state"``: each tensor-parallel rank saves and loads its own slice.

``loader`` (``ShardedStateLoader``), ``saver`` (``save_sharded_state``), ``manifest``
(file-name patterns and the ``Manifest`` written beside the files), ``directory`` (the
atomic swap of a checkpoint directory), ``weight_region`` (a CPU model's weights as
one block laid out as its file), ``resharder`` (a rank's slices at TP=N from a save at
TP=M), ``reshard_files`` (``vllm reshard``: a save's files rewritten for TP=N, tensor by
tensor) and ``verify`` (re-reading a written checkpoint). See docs/sharded_state.md.
"""
