"""Object storage (s3://, gs://, hf://, https:// and any other fsspec protocol) as a place for
inputs and run dirs. Config: conf/config.yaml `storage:`."""
