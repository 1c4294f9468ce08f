"""Online trainer: a two-tower retrieval model, its SavedModel export, and the loop that keeps it fresh."""
