"""The REST service around ``das_engine``: HTTP, authentication, validation and database rows."""
