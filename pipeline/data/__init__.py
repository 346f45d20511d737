"""Data in: readers of every source and log format, row checks, personal data, splitting, the teacher."""
