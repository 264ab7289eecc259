"""The trivial ClientApp: ``train`` replies the received arrays unchanged, weight 1."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Echo the arrays; ``num-examples`` = 1 (FedAvg's weight)."""
    content = RecordDict(
        {"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}
    )
    return Message(content, reply_to=msg)
