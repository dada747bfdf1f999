"""Teachers: the ensemble's combined distribution and the offline teacher cache."""
