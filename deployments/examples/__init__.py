"""Example Ray Serve applications that use the BATON engine through its handle API."""
