"""The built-in toy world: shapes, tiny pipelines, detector."""
