"""`txlab advise`: the fastest (or cheapest) feasible way to train a config on N devices of one hardware
profile, searched over layouts, memory policies and micro-batches, every figure predicted (docs/advise.md).

`space` enumerates the candidates, `prune` rules out what arithmetic can, `search` estimates the rest on a
staircase and ranks them, `report` prints and writes the answer, `command` is the command's flow."""
