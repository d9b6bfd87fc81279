"""The curate stage (conf/pipeline/curate.yaml, `curate:` in the config): normalize rows of any
chat or text shape into one schema, filter them, and sort the kept rows into pools."""
