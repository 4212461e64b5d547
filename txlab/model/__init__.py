"""The model as pure nn.Modules: the GPT decoder (`gpt`), its attention kernels (`attention`), int4
projections (`quant`) and the prefill/decode engine that drives the same modules token by token
(`decode`). Nothing here knows of policies, measurement or training: those act on the model from outside."""
