"""One-time data preparation: the built-in sample data set and the fast-loader converters."""
