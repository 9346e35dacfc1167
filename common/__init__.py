"""The ground floor the parties share: settings, metrics, protocol rules, the model and data."""
