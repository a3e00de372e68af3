"""The control plane's gateway side: transcripts store, hang-ups across replicas, webhook, sampling."""
