"""The catalog: content-addressed chunks and blobs, signed entries of the four libraries."""
