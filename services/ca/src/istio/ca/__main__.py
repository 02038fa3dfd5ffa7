from istio.ca.main import main

main()
