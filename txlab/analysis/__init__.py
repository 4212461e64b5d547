"""Analysis of a store: loading and labels (`data`), frontier tables (`frontier`), seaborn plots
(`plots`), the one-page report (`report`) and `txlab plot` / `txlab report` (`cli`). Reads only the
store: from the core it imports `txlab.results.columns` and `txlab.results.store`, nothing else."""
