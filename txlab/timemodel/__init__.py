"""The time model: one training step's operator trace (recorded on fake tensors) priced on a hardware profile
(txlab.hardware), laid on a compute and a communication stream, and what follows (step time, tokens/s, MFU,
exposed communication, dollars). `txlab calibrate` measures this machine's profile (txlab.timemodel.calibrate).
docs/time_model.md describes the model, its calibration and its validation."""
