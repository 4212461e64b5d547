"""The instruments of a trial and what they return: the memory monitor (`memory`), FLOPs and MFU
(`throughput`), the closed-form activation formula (`formula`), and the typed records every stage of a
trial returns (`records`). The trial pipeline that uses them is `txlab.trial`."""
