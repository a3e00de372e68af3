"""The gateway's HTTP control plane: calls API, transcripts, metrics, probes, dashboard."""
