"""pytest plugin shipped with diffcore (entry point ``pytest11``); fixtures for plugin authors."""
