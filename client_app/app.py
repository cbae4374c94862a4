"""ClientApp: one data owner. Wiring only; the round itself is `dplora.client.train`."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dplora import client, config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config.compose(context.run_config["overrides"])
    train_config = msg.content["config"]
    node_config = client.node_settings(dict(context.node_config), str(context.run_config["output-dir"]))
    content = client.train(cfg, msg.content["arrays"], context.state, node_config=node_config,
                           server_round=int(train_config["server-round"]),
                           run_key=str(train_config.get("run-key", "")))
    return Message(content=content, reply_to=msg)
