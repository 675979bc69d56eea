"""The console scripts, one small module each; the work is in the library.

    ztt-train     commands/train.py     train.train
    ztt-generate  commands/generate.py  generate.run_generate
    ztt-eval      commands/evaluate.py  evaluate.run_eval
    ztt-bench     commands/bench.py     bench.compare
    ztt-compile   commands/compile.py   compile.compile_for_topology
    ztt-convert   commands/convert.py   convert.convert
    ztt-prepare   commands/prepare.py   shards.write_shards

Each declares its flags once (a dataclass, see `common.flag`) and parses
them before importing jax, so `--help` and flag errors are quick.
`python -m ztt_jax.commands.train ...` is the same as `ztt-train ...`.
"""
