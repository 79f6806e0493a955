"""The stages of the streaming block pipeline that :class:`~quantkit.walker.ModelWalker` wires
together, one module each, in the order data flows:

- :mod:`.source` — read the source's weights once as a byte stream (NaN/Inf check, sha256s);
- :mod:`.plan` — what happens to each layer (:class:`LayerPlan`), and the output's
  ``config["quantization"]``;
- :mod:`.calibrate` — capture block inputs; the wrappers that gather each layer's statistics;
- :mod:`.collect` — a block's collection passes (per-block runners, tail cut, row chunks),
  merged over shards and processes;
- :mod:`.activations` — where a block's calibration activations wait between passes;
- :mod:`.solve` — one matrix: strategy, fallback, error figures, packing (dense and expert);
- :mod:`.expert_layers` — a block's expert layers: per-expert Hessians a batch of experts per
  pass, experts dealt out to processes;
- :mod:`.build` — the only place quantized layers are made from packed arrays;
- :mod:`.install` — quantized layers into the model (dense stand-ins while their block runs);
- :mod:`.shards` — write a finished block, reload it lazily, assemble mlx-lm's shard layout;
- :mod:`.hooks` — following a walk from outside (progress callback, :class:`WalkHook`);
- :mod:`.dtypes` — calibration dtypes by name, restoring a model's dtypes.
"""
