"""Reports on a run: funnel, verify, thumbnails, the curation report, concept coverage, HTML helpers."""
