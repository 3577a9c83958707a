"""The Celery worker: claims jobs from the database and runs them with ``das_engine``."""
