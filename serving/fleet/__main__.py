from .fleet import main

main()
