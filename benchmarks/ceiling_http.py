"""The HTTP ceiling: a Falcon ASGI app that reads the body and answers 202.

It runs under the gunicorn options the HTTP ingress uses (same worker
class, workers, keep-alive, backlog), taken from the same settings, so the
gap between the two is what the gateway's own work costs: parsing, the
NATS publish and the audit write.
"""

import falcon
import falcon.asgi

from common import logs
from common import settings as settings_module
from services.gunicorn_app import FanoutHttp, gunicorn_options

ANSWER = b'{"status": "accepted"}'


class Sink:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response):
        await req.stream.read()
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = ANSWER


def create_app() -> falcon.asgi.App:
    app = falcon.asgi.App()
    app.add_route("/MESSAGES", Sink())
    return app


def main() -> None:
    settings = settings_module.load_or_exit()
    logs.setup(settings.log_level)
    options = gunicorn_options(settings)
    options["proc_name"] = "bench-ceiling-http"
    FanoutHttp(options, create_app).run()


if __name__ == "__main__":
    main()
