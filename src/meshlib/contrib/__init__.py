"""Framework glue: one line to put an application's inbound side in the mesh (ASGI, Flask, Django)."""
