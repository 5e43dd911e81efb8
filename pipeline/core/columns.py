"""Column names the pipeline writes into its tables that more than one module needs, spelled once here
(``filters/registry.py`` derives the full reserved list from these and every scorer's columns)."""

# what img2dataset writes into each download row (an input column of the same name would be overwritten)
IMG2DATASET_COLUMNS = (
    "key", "url", "caption", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "md5", "sha256", "sha512",
)
# added to every normalised input row: its running index (both paths), its part and row there (parts)
ROW_COLUMNS = ("input_row", "input_file", "part_row")
# the decisions table (selected/decisions.parquet), one row per input row: written by the select stage
# (filters/rules.py decision_sql), read by the catalog, the funnel, verify and the reports
DECISION_COLUMNS = ("key", "state", "rule", "error", "failed_stage", "duplicate_of")
