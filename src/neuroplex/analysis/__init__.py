"""Analysis: pure functions from (model, probe batch) to arrays and tables; models untouched."""
