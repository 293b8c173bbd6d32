"""gunicorn configuration: start flask-durable's scheduler in each worker as
soon as the worker has loaded the app, instead of on its first request.

gunicorn reads ``gunicorn.conf.py`` from the directory it starts in (or the
file given with ``-c``).
"""


def post_worker_init(worker):
    # Called in each worker once it has loaded the app. ``worker.wsgi`` is
    # what gunicorn serves: the app that ``create_app()`` returned.
    from app import durable

    try:
        with worker.wsgi.app_context():
            durable.start()
    except Exception:
        # The database cannot be reached yet: the worker still boots, and
        # the scheduler starts on its first request instead.
        worker.log.exception("flask-durable: scheduler not started")
    else:
        worker.log.info("flask-durable: scheduler started")
