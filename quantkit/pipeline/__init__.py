"""The streaming block pipeline's parts that touch files: reading the source weights
(:mod:`.source`) and writing finished blocks as output shards (:mod:`.shards`)."""
