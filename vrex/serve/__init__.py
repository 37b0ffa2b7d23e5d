"""``vrex serve``: a live video assistant over HTTP + WebSocket, with a browser page.

Modules: ``limits`` (limits and client errors), ``auth`` (bind rules), ``timeline`` (what each
answer read), ``live`` (one served stream), ``worker`` (the model thread), ``cluster`` (``--cluster``:
sessions on Ray actors instead), ``saved`` (``--sessions-dir``), ``sources`` (server-side files and
URLs), ``hub`` (server state), ``app`` (the API), ``server`` (uvicorn), ``bench``.
"""
