"""Code database, distance tables, exact table-lookup search and binary hashing of the FDN codes."""
