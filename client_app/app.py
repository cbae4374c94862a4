"""ClientApp: one data owner. Wiring only; the round itself is `dplora.client.train`."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from dplora import client, config
from dplora.protocol import ARRAYS, CONFIG, PROXIMAL_MU, RUN_KEY, SERVER_ROUND
from dplora.transport import transport_mod


def user_dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod when the server asks for client-side clipping (strategy.user_dp.side=client),
    i.e. when its config carries a clipping norm; otherwise the message passes through unchanged."""
    if CONFIG in msg.content.config_records and KEY_CLIPPING_NORM in msg.content[CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[transport_mod, user_dp_clipping])  # the first wraps the rest: clipping sees fp32


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config.compose(context.run_config["overrides"])
    train_config = msg.content[CONFIG]
    node_config = client.node_settings(dict(context.node_config), str(context.run_config["output-dir"]))
    content = client.train(cfg, msg.content[ARRAYS], context.state, node_config=node_config,
                           server_round=int(train_config[SERVER_ROUND]),
                           run_key=str(train_config.get(RUN_KEY, "")),
                           proximal_mu=float(train_config.get(PROXIMAL_MU, 0.0)))
    return Message(content=content, reply_to=msg)
