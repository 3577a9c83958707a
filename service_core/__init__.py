"""What the API (`app`) and the worker (`worker`) share, importing neither: the ORM models,
the job lifecycle rules, settings, the database session, artifact storage, the queue
dispatcher, the periodic sweep, redaction and process plumbing. Imports run
app -> service_core <- worker, and worker -> das_engine."""
