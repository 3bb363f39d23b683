"""Work spread over processes: the tile workers, the predicting process, cohorts on dask.distributed."""
