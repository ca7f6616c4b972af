from launcher.cli import main

# The guard matters: spawned workers re-import the parent's main module.
if __name__ == "__main__":
    main()
