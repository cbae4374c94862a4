"""ClientApp: one data owner. Wiring only; the round itself is `dplora.client.train`."""

from __future__ import annotations


from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dplora import client, config


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config.compose(context.run_config["overrides"])
    if not {"partition-id", "num-partitions"} <= set(context.node_config):
        raise ValueError("this SuperNode's node config needs partition-id and num-partitions "
                         f"(got {dict(context.node_config)}); e.g. --node-config 'partition-id=0 num-partitions=2'")
    content = client.train(
        cfg, msg.content["arrays"], context.state,
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
        server_round=int(msg.content["config"]["server-round"]))
    return Message(content=content, reply_to=msg)
