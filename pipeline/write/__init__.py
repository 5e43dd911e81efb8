"""The write stage: curated webdataset shards and their manifest."""
