"""`dergw console`: the site technician's terminal UI, a separate process from the gateway.

It reads the gateway through its local API (a Unix socket), never the gateway's store, so a UI bug
can never stop control. Textual is an optional dependency (`pip install 'dergw[console]'`): the
gateway process never imports this package.
"""
