"""Task runners: one module per task, each running jobs on a loaded model."""
