"""Spreading one trial over devices: FSDP2 sharding applied from outside the model, per block (`fsdp`),
and the N-rank measured trial on this machine (`launch`). Names leave room for tensor and context
parallel later."""
