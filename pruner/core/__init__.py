"""The ground floor: declared parameters, Wanda's score, intervals and process-memory housekeeping (imports nothing
above itself)."""
