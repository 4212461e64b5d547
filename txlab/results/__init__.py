"""What a trial leaves behind: the row's columns (`columns`), the Parquet store (`store`) and the
human-readable summary of a row (`format`). The analysis layer reads only `columns` and `store`."""
