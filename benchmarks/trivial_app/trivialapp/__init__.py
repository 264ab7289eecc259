"""A do-nothing Flower app: FedAvg over clients that send back what they receive."""
