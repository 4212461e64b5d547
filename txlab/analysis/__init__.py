"""Analysis of a store: loading and labels (`data`), frontier tables (`frontier`), the plots by name (`plots`,
one family a module: `memory_plots`, `frontier_plots`, `tradeoff_plots`, `chunk_plots`, `device_plots`; shared
pieces in `plotting`, `layout`, `palette`), the one-page report (`report`) and `txlab plot` / `txlab report`
(`cli`); training curves of `txlab train` run directories (`training_plots`) and the attention-distance plot
(`attention`). Reads only the store and run directories: from the core it imports `txlab.results.columns` and
`txlab.results.store`, nothing else."""
