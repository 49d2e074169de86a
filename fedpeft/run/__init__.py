"""Running a simulation: the local SuperLink + ``flwr run`` launcher, process tracking, the
per-round progress line and the reports (metrics log, results table, PNG)."""
